"""DICOM de-identification after the Basic Application Level Confidentiality Profile
(DICOM PS3.15 Annex E, table E.1-1), applied to every uploaded DICOM before anything of
it is stored.

pydicom has no profile helper, so this is the profile's rules as a small tag list and a
walk over the dataset (nested sequences included):

- private tags: removed;
- curves and overlays (groups 50xx, 60xx; overlays can hold burned text): removed;
- person names (any PN element): emptied where the profile says Z, removed otherwise;
- dates and times (any DA, DT, TM element): emptied where Z, removed otherwise;
- instance UIDs (any UI element that is not a registered class or transfer syntax
  UID): replaced by new UIDs, the same original giving the same replacement within one
  process (a random per-process salt: no replacement can be traced back);
- the identifying attributes of :data:`REMOVE` (ids, addresses, institution, devices,
  free-text comments and descriptions, age, size, weight, ...): removed;
- the type 2 attributes of :data:`EMPTY` (patient name and id, birth date, sex, study
  id, accession number, ...): kept, emptied;
- Patient Identity Removed = YES and De-identification Method are set.

The web app keeps only the pixels of a de-identified DICOM (as PNG), so the header
never reaches its storage; this module is what makes that header safe if a later
version stores it. Pixels are not inspected: a DICOM whose Burned In Annotation is YES
is refused by the caller (:func:`burned_in_annotation`).
"""

from __future__ import annotations

import hashlib
import secrets

import pydicom
from pydicom.dataelem import DataElement
from pydicom.uid import UID

# Type 2 attributes the profile blanks (Z): present, empty.
EMPTY = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDate", "StudyTime", "ContentDate", "ContentTime", "ContentCreatorName",
    "VerifyingObserverName", "PersonName", "ConsentForClinicalTrialUseSequence",
})

# Attributes the profile removes (X) that the VR rules below do not already catch.
REMOVE = frozenset({
    # patient
    "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientAge", "PatientSize",
    "PatientWeight", "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
    "PatientReligiousPreference", "PatientComments", "PatientState", "PatientTransportArrangements",
    "PatientSexNeutered", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "MedicalAlerts", "Allergies", "CountryOfResidence", "RegionOfResidence", "SmokingStatus", "PregnancyStatus",
    "LastMenstrualDate", "SpecialNeeds", "AdditionalPatientHistory", "ReferencedPatientSequence",
    "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence", "ResponsiblePerson",
    "ResponsibleOrganization", "PersonAddress", "PersonTelephoneNumbers", "PersonIdentificationCodeSequence",
    "InsurancePlanIdentification", "AdmissionID", "IssuerOfAdmissionID", "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence", "DischargeDiagnosisDescription", "ServiceEpisodeID",
    "IssuerOfServiceEpisodeID", "ServiceEpisodeDescription", "VisitComments", "CurrentPatientLocation",
    "ScheduledPatientInstitutionResidence", "PatientSetupUID",
    # institution, staff and devices
    "InstitutionName", "InstitutionAddress", "InstitutionCodeSequence", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "OperatorIdentificationSequence", "RequestingPhysician", "RequestingService", "OrderEnteredBy",
    "OrderEntererLocation", "OrderCallbackPhoneNumber", "StationName", "DeviceSerialNumber", "DeviceUID",
    "DetectorID", "GantryID", "GeneratorID", "CassetteID", "PlateID", "ModifyingDeviceID",
    "PerformedStationAETitle", "PerformedStationName", "PerformedLocation", "ScheduledStationAETitle",
    "ScheduledStationName", "ScheduledProcedureStepLocation", "ScheduledStationGeographicLocationCodeSequence",
    "RequestedProcedureLocation", "CustodialOrganizationSequence", "HumanPerformerOrganization",
    "ScheduledHumanPerformersSequence", "ActualHumanPerformersSequence", "ParticipantSequence",
    "AuthorObserverSequence", "VerifyingObserverSequence", "VerifyingObserverIdentificationCodeSequence",
    "VerifyingOrganization", "InterpretationApproverSequence", "InterpretationIDIssuer", "ResultsIDIssuer",
    "DistributionAddress", "IntendedRecipientsOfResultsIdentificationSequence", "SourceApplicationEntityTitle",
    # orders, requests, procedures
    "StudyIDIssuer", "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID", "RequestedProcedureDescription", "RequestedProcedureComments",
    "RequestAttributesSequence", "RequestedContrastAgent", "ReasonForStudy", "ReasonForTheRequestedProcedure",
    "ImagingServiceRequestComments", "PerformedProcedureStepID", "PerformedProcedureStepDescription",
    "CommentsOnThePerformedProcedureStep", "ScheduledProcedureStepDescription", "ScheduledProcedureStepID",
    "ProtocolName", "PreMedication", "AcquisitionContextSequence",
    # free text and descriptions
    "StudyDescription", "SeriesDescription", "StudyComments", "ImageComments", "FrameComments",
    "IdentifyingComments", "AcquisitionComments", "AcquisitionDeviceProcessingDescription",
    "DerivationDescription", "ModifiedImageDescription", "ImagePresentationComments", "TextComments",
    "TextString", "TextValue", "ResultsComments", "Impressions", "InterpretationText",
    "InterpretationDiagnosisDescription", "ContributionDescription", "TopicTitle", "TopicSubject",
    "TopicAuthor", "TopicKeywords", "ConfidentialityConstraintOnPatientDataDescription",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolName", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointDescription", "ClinicalTrialCoordinatingCenterName",
    # whatever else could carry identity
    "IconImageSequence", "OriginalAttributesSequence", "ModifiedAttributesSequence", "DigitalSignaturesSequence",
    "DataSetTrailingPadding", "ReferencedImageSequence", "SourceImageSequence", "ReferencedStudySequence",
    "ReferencedPerformedProcedureStepSequence", "ReferencedFrameOfReferenceUID",
})

METHOD = "DermSight: PS3.15 E.1 Basic Profile"  # LO: at most 64 characters
_SALT = secrets.token_bytes(32)  # per process: replacement UIDs cannot be traced back


def burned_in_annotation(dataset: pydicom.Dataset) -> bool:
    """True when the DICOM says its pixels carry identifying text (Burned In Annotation YES)."""
    return str(dataset.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def new_uid(original: str) -> str:
    """The replacement of an instance UID: the same within one process, untraceable."""
    digest = hashlib.sha256(_SALT + original.encode("ascii", "replace")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # a UUID-derived UID (PS3.5 B.2)


def deidentify(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """De-identify `dataset` in place (and its file meta) and return it."""
    dataset.remove_private_tags()
    dataset.walk(_element_rule)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = new_uid(str(meta.MediaStorageSOPInstanceUID))
        for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                        "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation"):
            if keyword in meta:
                delattr(meta, keyword)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    return dataset


def _element_rule(dataset: pydicom.Dataset, element: DataElement) -> None:
    group = element.tag.group
    if 0x5000 <= group <= 0x50FF or (0x6000 <= group <= 0x60FF):  # curves, overlays
        del dataset[element.tag]
        return
    keyword = element.keyword
    if keyword in EMPTY:
        element.value = [] if element.VR == "SQ" else ""
        return
    if keyword in REMOVE or element.VR in ("PN", "DA", "DT", "TM"):
        del dataset[element.tag]
        return
    if element.VR == "UI" and element.value:
        values = element.value if element.VM > 1 else [element.value]
        replaced = [str(v) if _registered(str(v)) else new_uid(str(v)) for v in values]
        element.value = replaced if element.VM > 1 else replaced[0]


def _registered(uid: str) -> bool:
    """A UID of the DICOM registry (SOP class, transfer syntax, coding scheme): no identity."""
    return UID(uid).name != uid
